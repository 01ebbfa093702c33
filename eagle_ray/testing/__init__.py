"""Hooks for tests and chaos runs only: nothing here acts unless a test, a chaos run or its env var asks."""
