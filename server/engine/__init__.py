"""Engine: scheduling, KV-cache accounting, the model runner and the engine thread."""
