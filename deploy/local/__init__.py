"""Local topology helpers: the load balancer in front of service replicas."""
