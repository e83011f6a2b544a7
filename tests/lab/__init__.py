"""Test hosts for end-to-end tests: real OpenSSH sshd in Linux network namespaces (see netns.py)."""
