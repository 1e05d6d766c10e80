"""Data layer: locate the paper data sets, load them into device tensors, batch them identically on any rank count."""
