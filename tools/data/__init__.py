"""Data preparation for users: download the demo CTs, generate synthetic data, convert DICOM and write datalists."""
