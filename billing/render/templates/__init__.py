"""Package data for billing.render: the invoice template (invoice.html) and the label catalogue
(messages.yaml). A package so that setuptools' ``*.html`` / ``*.yaml`` package-data globs ship them."""
