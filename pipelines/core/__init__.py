"""What every job shares: storage, stage bookkeeping, and how we talk to Ray."""
