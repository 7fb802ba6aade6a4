"""The archive: archive routes' committed inputs kept in compressed, checksummed segments, each placed on the
gateway or in cloud object storage by the storage cost model (C_total = C_storage + C_retrieval), deleted by
retention wherever it is, and read back by a query from wherever it is. See docs/archive.md.

Nothing here is imported by an agent without archive routes; the object store's client is imported lazily.
"""
