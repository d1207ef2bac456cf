"""HTTP routes: /verify, /audit, /admin/keys, health and metrics."""
