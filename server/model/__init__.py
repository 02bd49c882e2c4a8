"""Model: the frozen base model's forward, weight loading and adapter-aware layers."""
