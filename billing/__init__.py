"""Billing: price books, FX, cross-border tax, invoices, credit notes, reports."""
