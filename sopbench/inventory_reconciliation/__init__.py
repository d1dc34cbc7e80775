"""Inventory cycle-count reconciliation: answer by querying a per-episode SQLite database."""

from sopbench.inventory_reconciliation.task import InventoryEnvironment, InventoryReconciliation

__all__ = ["InventoryEnvironment", "InventoryReconciliation"]
