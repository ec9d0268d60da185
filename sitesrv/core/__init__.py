"""The core: authentication, costing, charging and the Find-Me queue."""
