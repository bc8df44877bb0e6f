"""IH-GRPO: tool-integrated reasoning where writing code and running it are decoupled."""

__version__ = "0.1.0"
