"""Detectors: what tells the engine an application is active (conntrack, the socket table,
processes), behind ``detect.base.Detector``."""
