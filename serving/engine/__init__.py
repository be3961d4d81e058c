"""The engine core: the scheduler (the one decision-maker), the schedule -> run -> update -> send loop,
its process and the API side's client, and output processing (detokenize, stop strings)."""
