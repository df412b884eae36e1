"""Example environments kept outside the library, loaded as plug-ins (docs/environments.md)."""
