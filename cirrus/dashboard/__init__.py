"""The dashboard's page: static files (`static/`) served by the admin API (cirrus/admin_dashboard.py)."""
