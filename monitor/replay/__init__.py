"""inferwatch replay: the detect and respond code over history, and its forensic report."""
