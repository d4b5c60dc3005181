"""Small helpers shared across the library (I/O, seeding, devices)."""
