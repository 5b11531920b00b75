"""gunsound: gun type classification from gunshot audio."""
