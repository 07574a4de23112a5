"""OpenAI's Batch API: files and batches (routes, service, store), and the runner that runs their lines
at a lower priority than live traffic through the completion pipeline's steps."""
