"""The engines: the relay of admitted requests (relay), its connection pool (pool), the client of /tokenize and
/health (client), health checks (health) and the engines' own load read from /metrics (engine_metrics)."""
