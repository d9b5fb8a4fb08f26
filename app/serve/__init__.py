"""`fusion serve`: the HTTP server, its limits, the request batcher and the page, over one Predictor."""
