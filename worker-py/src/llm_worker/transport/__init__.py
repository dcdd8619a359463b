"""Redis/BullMQ side of the worker (no torch here): jobs in, events and results out."""
