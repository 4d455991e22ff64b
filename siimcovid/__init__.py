"""siimcovid: SIIM-FISABIO-RSNA COVID-19 detection, from raw DICOM to a scored submission."""

__version__ = "0.1.0"
