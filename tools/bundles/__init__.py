"""Bundle tooling: generating and verifying the bundles (maintainers), packing and running them (users)."""
