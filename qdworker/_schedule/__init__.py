"""When jobs run: cron ticks and retry delays."""
