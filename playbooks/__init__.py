"""Ansible playbooks and roles that deploy the appliance (shipped as package data)."""
