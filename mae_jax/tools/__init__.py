"""Command-line tools: conversion, benchmarks, export, visualisation."""
