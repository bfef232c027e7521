"""The prediction record's schema revisions, oldest first."""
