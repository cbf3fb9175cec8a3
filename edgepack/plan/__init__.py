"""Planning: bits and a device_map for a model on a device, from sizes alone (planner.py),
and device profiles, built in or probed on this box (profile.py). No torch."""
