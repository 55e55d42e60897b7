"""One module per experiment; each prints or writes its results."""
