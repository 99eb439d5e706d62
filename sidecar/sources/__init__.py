"""Rule sources: each produces the complete set of rule files it currently holds."""
