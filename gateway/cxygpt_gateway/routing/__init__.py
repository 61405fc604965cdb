"""Where a request goes: its key (keys), the ring of a model's replicas (ring), the policies that order them
(policies), and the registry of every model's route (registry)."""
