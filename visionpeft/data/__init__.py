"""Reserved for later issues (see DESIGN.md section 3)."""
