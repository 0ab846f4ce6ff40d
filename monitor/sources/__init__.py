"""Where raw inference-log messages come from: a Kafka consumer group, or JSONL files for offline runs."""
