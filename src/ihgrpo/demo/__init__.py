"""The embedded main job. Until the RL demo lands, `ihgrpo demo` runs the protocol walkthrough."""
