"""The archive: raw inputs of archive routes kept for their retention, on the gateway or in cloud storage."""
