"""Stage 2, respond: detections become incidents, incidents run playbooks (DESIGN §1, §5)."""
