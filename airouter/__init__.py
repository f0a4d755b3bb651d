"""airouter."""
