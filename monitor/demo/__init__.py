"""The demo: an embedded broker, real models' traffic with incidents, the daemon, detections on the console."""
