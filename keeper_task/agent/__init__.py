"""HTTPS clients of the agent's local API (Plugin Settings: Plugin tier; Jobs: Admin tier)."""
