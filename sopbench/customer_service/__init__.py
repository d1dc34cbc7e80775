"""Customer service: an ISP support desk's fault-call SOP over a stateful, seeded sandbox."""

from sopbench.customer_service.task import CustomerService, SupportDesk

__all__ = ["CustomerService", "SupportDesk"]
