"""Stage adapters, one per framework. Import the one you need; none is
imported by ``import pipetrain``."""
