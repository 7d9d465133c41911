"""Reports: JSON/HTML audits, tables and matplotlib figures."""
