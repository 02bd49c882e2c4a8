"""Tool calls read out of a model's free answer (`tool_choice: "auto"`), one module per family's format."""
