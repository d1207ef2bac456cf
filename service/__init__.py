"""idverify: does the photo on an ID chip show the person in front of the camera?"""
