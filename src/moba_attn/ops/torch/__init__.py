"""MoBA in pure PyTorch: the gate, attention forward/backward and the KV-cache step (any device)."""
