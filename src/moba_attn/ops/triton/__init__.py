"""MoBA in Triton: kernels (``kernels.py``), planning (``schedule.py``) and launchers (``gate.py``, ``forward.py``, ``backward.py``, ``decode.py``)."""
