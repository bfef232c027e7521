"""Life after deployment: the prediction record, clinicians' feedback and drift monitoring."""
