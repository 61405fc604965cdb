"""Autoscaling a ModelDeployment's replicas: the pure policy (policy), the gateways' demand read from their metrics
(demand), and one step that reads the demand and writes the count and status.autoscaling (step)."""
