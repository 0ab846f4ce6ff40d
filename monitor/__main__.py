from monitor.cli import main

# Guarded: the consumer process is started with "spawn", which imports the parent's main module.
if __name__ == "__main__":
    raise SystemExit(main())
