"""The ``crm-appliance`` command and the deployment steps behind it."""
