"""Array drivers: one contract; mock, tester (VISA / serial), replay; the emulated tester."""
